"""The expression dictionary: FAISS index build and query, and the β_prior lookup."""
