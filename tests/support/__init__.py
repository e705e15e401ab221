"""Test helpers that start real components (servers, certificates, balancers)."""
