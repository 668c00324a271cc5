"""Reward heads shipped with the package (safetensors + metadata; see ``esamp_agents.hidden_reward.reward``)."""
