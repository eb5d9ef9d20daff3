"""Storage: one URI grammar, fetching and uploading per backend, credentials, the workspace."""
