"""Development and test tools (not installed with the package): local services for `make server` and the tests."""
