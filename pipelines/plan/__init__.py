"""Plan: scenes -> chunk windows with their halo (n-D), the order they are read in, and each
scene's name and fingerprint. Pure maths and small records: no Ray, torch or pixel I/O."""
