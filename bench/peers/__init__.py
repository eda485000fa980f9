"""The peers: small servers doing the same job as one of ours, each run as
``python -m bench.peers.NAME PORT [ARGS]`` by the harness."""
