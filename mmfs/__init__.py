"""mmfs: a FUSE filesystem whose file contents live in memory maps."""
