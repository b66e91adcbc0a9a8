"""Reference implementations of the contract's ops on plain torch (any device)."""
