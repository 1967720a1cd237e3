"""Reproducible benchmarks of cocoon-net against ISC Kea and dnsmasq (see bench/README.md)."""
