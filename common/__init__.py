"""Small modules both sides import: the wire format and task definitions (numpy at most)."""
