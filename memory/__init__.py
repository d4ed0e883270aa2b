"""Durable memory: the SQL store (SQLModel), the image store, and the FAISS replay memory."""
