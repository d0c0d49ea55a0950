"""Domain records and validation, free of I/O."""
