"""The contract with Dify: the wire models, metadata conditions and the outcome words."""
