"""`python -m cloud_gateway` is `cloud-gateway`."""

from cloud_gateway.cli import main

main()
