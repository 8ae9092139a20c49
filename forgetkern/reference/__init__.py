"""Pure-PyTorch references: the test oracle of every kernel and the fallback that runs anywhere."""
