"""LightningDataModules: embedded data sets that need no download, and local real data."""
