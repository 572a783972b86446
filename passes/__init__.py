"""FX graph passes on the Dynamo graph; `manager.PassManager` runs and records them."""
