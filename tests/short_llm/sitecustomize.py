"""Loaded at interpreter start when this folder is on PYTHONPATH: the process's LLM may emit at
most RTSERVER_TEST_TOKEN_TEXT_RATIO speech tokens per text token (CosyVoice's cap is 20), so
a test server reaches the length cap on every segment instead of after minutes of speech."""

import os

import cosyvoice.llm.engine

cosyvoice.llm.engine.MAX_TOKEN_TEXT_RATIO = int(os.environ["RTSERVER_TEST_TOKEN_TEXT_RATIO"])
