"""attnserve's model layer: a Llama-style decoder, its KV cache, tokenizer, sampling and engine.

Torch only — no web code. The server imports from here; nothing here imports the server.
"""
