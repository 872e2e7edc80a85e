"""The UV's protocol core (no transport): see ultravisor.py for the map of its modules."""
