"""Bookkeeping only: requests, scheduling and KV block accounting. No torch import here."""
