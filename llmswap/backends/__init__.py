"""Backend drivers: how a model's server is started, stopped and watched."""
