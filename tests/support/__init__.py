"""Test helpers: real daemons on ephemeral ports, fault-injecting proxies."""
