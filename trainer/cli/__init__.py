"""Console entry points (``ldm-*``): thin shells over library functions the tests call directly."""
