"""The description of a call: what every rank must agree on, parsed once at the edge."""
