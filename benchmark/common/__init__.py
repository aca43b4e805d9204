"""The bottom of the harness: crash-safe files and locks, path roots, the device. Imports
nothing of the project."""
