"""The training half of shnet: cached features -> trained 3SHNet retrieval model -> metrics."""
