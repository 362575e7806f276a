"""The base of every configuration section: a frozen model that refuses
unknown keys, so a misspelt setting fails at start instead of being ignored."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """One table of the configuration ([server], [limits], ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
