"""The blocking client, generated from nac_client._async by scripts/unasync.py."""
