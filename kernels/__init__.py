"""Graph diffusion core: graph model, operators, diffusion methods and compute backends.

Pure numerics and blocking calls only: no asyncio lives here (callers run it in threads).
"""
