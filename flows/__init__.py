"""Prefect 3 flows over the same stage functions that DVC runs."""
