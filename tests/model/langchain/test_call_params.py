"""One table of ESamp/sampling parameters: the LangChain fields, per-call keys and identifying
params are all derived from it, so they can never drift apart again."""

from __future__ import annotations

from langchain_core.messages import HumanMessage

from esamp_agents.langchain.chat_model import ChatESamp
from esamp_agents.langchain.llm import ESampLLM


def test_ignore_eos_gives_exactly_max_tokens(embedded):
    # "Say OK." ends early when the end-of-turn token counts; ignore_eos keeps every reply going.
    chat = ChatESamp(loaded_model=embedded, max_tokens=40, temperature=0, seed=0)
    short = chat.generate([[HumanMessage("Say OK.")]]).generations[0][0].generation_info
    assert short["finish_reason"] == "stop" and short["completion_tokens"] < 40
    for gen in chat.generate([[HumanMessage("Say OK.")]], ignore_eos=True, n=2).generations[0]:
        assert gen.generation_info["completion_tokens"] == 40
        assert gen.generation_info["finish_reason"] == "length"
    field = ChatESamp(loaded_model=embedded, max_tokens=40, temperature=0, seed=0, ignore_eos=True)
    assert field.generate([[HumanMessage("Say OK.")]]).generations[0][0].generation_info["completion_tokens"] == 40
    llm = ESampLLM(loaded_model=embedded, max_tokens=12, seed=0, ignore_eos=True)
    prompt = embedded.apply_chat_template([{"role": "user", "content": "Say OK."}])
    gens = llm.generate([prompt], n=2).generations[0]
    assert [g.generation_info["completion_tokens"] for g in gens] == [12, 12]


def test_shared_distiller_trains_one_distiller_for_all_prompts(embedded):
    llm = ESampLLM(loaded_model=embedded, max_tokens=6, seed=0, n=2)
    prompts = ["The capital of France is", "1, 2, 3,"]
    apart = llm.generate(prompts).llm_output["distiller_loss"]
    assert apart[0] != apart[1]  # one Distiller per prompt: two different curves
    shared = llm.generate(prompts, shared_distiller=True).llm_output["distiller_loss"]
    assert len(shared) == 2 and shared[0] == shared[1]  # one Distiller: every prompt reports its curve
    field = ESampLLM(loaded_model=embedded, max_tokens=6, seed=0, n=2, shared_distiller=True)
    assert field.generate(prompts).llm_output["distiller_loss"] == shared
