"""The torch.fx passes of fxconet (installed as ``fxconet.passes``)."""
