"""Width-choosing strategies: static and uniform scaling, CONet, APS."""
