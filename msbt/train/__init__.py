"""Training: the one stage loop (`loop`), its multi-worker step (`distributed`), the Ray Train runner
(`runner`), the record of finished stages (`stages`) and TensorBoard event files (`tblog`).
"""
