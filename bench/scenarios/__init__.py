"""One module per service: each defines ``run(ctx) -> list[Figure]``."""
