"""``shnet demo``: synthetic captioned scenes, extracted, trained and evaluated end to end."""
