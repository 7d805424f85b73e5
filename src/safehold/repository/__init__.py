"""The repository: opening, keys, reading, the write session, locks and the local cache."""
