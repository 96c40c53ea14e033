//! Legacy platform devices.
