"""The asyncio client; nac_client._sync is generated from it by scripts/unasync.py."""
