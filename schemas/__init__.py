"""msgspec Structs for every method's params and result, on the method's path."""
