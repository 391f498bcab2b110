//! Sampling schedules (SPEC §4): shift counts, image orders, the text block schedule.
