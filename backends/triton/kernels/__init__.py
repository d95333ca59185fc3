"""Hand-written Triton kernel templates; the backend imports the host wrappers from the modules here."""
