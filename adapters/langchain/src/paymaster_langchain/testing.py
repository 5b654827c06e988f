"""Test helpers: drive LangChain agents offline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

from ._compat import NeverStreams

__all__ = ["ScriptedChatModel"]


class ScriptedChatModel(NeverStreams, GenericFakeChatModel):
    """Replays scripted ``AIMessage``s, tool calls included, and accepts ``bind_tools``
    (``GenericFakeChatModel`` refuses it, and its streaming drops tool calls, so this
    model never streams)::

        ScriptedChatModel(messages=iter([AIMessage("", tool_calls=[...]), AIMessage("done")]))
    """

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self
