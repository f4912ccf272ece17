"""The expert library: PEFT adapter folders on disk, SQLite metadata, a FAISS index over descriptions."""
