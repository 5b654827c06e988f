"""Vendor modules: how one vendor's operations map to governed calls.

Each vendor module is framework-neutral: it knows the vendor's endpoints, what a call
costs before and after it runs, and how to read the vendor's responses. Adapters and the
proxy use them; nothing here imports an agent framework.
"""
