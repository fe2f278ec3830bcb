"""RPC handlers; a handler's dotted method name is its module path plus its name."""
