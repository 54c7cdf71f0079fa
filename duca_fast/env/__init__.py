"""Environments for two-horizon dialogue RL: the sales task in free text and its dialogue-act twin.

Nothing here imports torch. ``make_env("sales")`` / ``make_env("sales-acts")`` build the two environments;
both follow the ``DialogueEnv`` contract of ``duca_fast.env.base``. The LLM customer's names load on first
use: they need ``openai`` (the ``train`` extra), the rest of the package does not.
"""

import importlib

from duca_fast.env.acts import ACTS, HIDDEN_OBSERVATION_SIZE, OBSERVATION_SIZE, SalesActsEnv, render_act
from duca_fast.env.base import DialogueEnv, Observation, Outcome, TurnResult, step_many
from duca_fast.env.customer import CUSTOMER_INTENTS, Customer, CustomerReply, CustomerState, ScriptedCustomer
from duca_fast.env.metrics import SalesMetrics, compute_metrics
from duca_fast.env.regimes import REGIMES, SESSION_SCALES, RegimeCustomer, TwinRegime, make_regime
from duca_fast.env.rewards import (
    SESSION_REWARD_NAMES,
    TURN_REWARD_NAMES,
    VIOLATION_WEIGHTS,
    compliance_reward,
    compliance_violations,
    fluency_reward,
    heuristic_fluency,
    margin_reward,
    naturalness_reward,
    repetition_reward,
)
from duca_fast.env.sales import SalesEnv, check_agent_message
from duca_fast.env.scenarios import (
    SALES_COACHING,
    SCENARIO_MIXES,
    ComplianceRules,
    Feature,
    Persona,
    Product,
    Scenario,
    generate_scenarios,
    load_scenarios,
    save_scenarios,
)
from duca_fast.env.text import AgentTurnReading, read_agent_message

ENV_NAMES: tuple[str, ...] = ("sales", "sales-acts")
_LLM_CUSTOMER_NAMES = (
    "CustomerDecision",
    "CustomerEndpointError",
    "LLMCustomer",
    "LLMCustomerConfig",
    "LLMCustomerFactory",
    "LLMCustomerStats",
    "parse_decision",
)


def __getattr__(name: str) -> object:
    if name not in _LLM_CUSTOMER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module("duca_fast.env.llm_customer")
    except ModuleNotFoundError as error:
        raise ImportError(
            f"duca_fast.env.{name} needs openai ({error}); pip install 'duca-fast[train]'"
        ) from error
    return getattr(module, name)


def make_env(name: str, **kwargs: object) -> DialogueEnv:
    """Build an environment by name ("sales" or "sales-acts"); kwargs go to its constructor."""
    if name == "sales":
        return SalesEnv(**kwargs)
    if name == "sales-acts":
        return SalesActsEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; expected one of {ENV_NAMES}")


__all__ = [
    "ACTS",
    "CUSTOMER_INTENTS",
    "ENV_NAMES",
    "HIDDEN_OBSERVATION_SIZE",
    "OBSERVATION_SIZE",
    "REGIMES",
    "SALES_COACHING",
    "SCENARIO_MIXES",
    "SESSION_REWARD_NAMES",
    "SESSION_SCALES",
    "TURN_REWARD_NAMES",
    "VIOLATION_WEIGHTS",
    "AgentTurnReading",
    "ComplianceRules",
    "Customer",
    "CustomerDecision",
    "CustomerEndpointError",
    "CustomerReply",
    "CustomerState",
    "DialogueEnv",
    "Feature",
    "LLMCustomer",
    "LLMCustomerConfig",
    "LLMCustomerFactory",
    "LLMCustomerStats",
    "Observation",
    "Outcome",
    "Persona",
    "Product",
    "RegimeCustomer",
    "SalesActsEnv",
    "SalesEnv",
    "SalesMetrics",
    "Scenario",
    "ScriptedCustomer",
    "TurnResult",
    "TwinRegime",
    "check_agent_message",
    "compliance_reward",
    "compliance_violations",
    "compute_metrics",
    "fluency_reward",
    "generate_scenarios",
    "heuristic_fluency",
    "load_scenarios",
    "make_env",
    "make_regime",
    "margin_reward",
    "naturalness_reward",
    "parse_decision",
    "read_agent_message",
    "render_act",
    "repetition_reward",
    "save_scenarios",
    "step_many",
]
