"""fxconet: choose the channel widths of any CNN with torch.fx."""

__version__ = "0.1.0"
