"""Getting bundles onto devices: the registry, the SSH and local transports, flashing and rollback."""
