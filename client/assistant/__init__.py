"""The device's assistant: answering (engine, conversation, the orchestrator), what it learns
from its user right away (feedback, adapt, experts, evidence) and the user's profile."""
