//! Which channels carry what. With K dedicated device-state channels (the device-state
//! series' design), the last K channels carry only device state and the others only RAM;
//! with none, every channel carries both. The source's channel pools and the destination's
//! per-packet check both ask this one type. A leaf: it imports nothing from the crate.

/// The role of every channel of one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChannelRoles {
    channels: u8,
    /// Channels from this id up carry only device state; `channels` when none does.
    first_device_channel: u8,
}

impl ChannelRoles {
    /// `channels` channels of which the last `dedicated` carry only device state; the
    /// negotiation has checked that `dedicated < channels`.
    pub(crate) fn new(channels: u8, dedicated: u8) -> Self {
        Self {
            channels,
            first_device_channel: channels.saturating_sub(dedicated),
        }
    }

    /// Whether some channels are reserved for device state.
    pub(crate) fn has_dedicated(&self) -> bool {
        self.first_device_channel < self.channels
    }

    /// Whether `channel` may carry RAM pages.
    pub(crate) fn carries_ram(&self, channel: u8) -> bool {
        channel < self.first_device_channel
    }

    /// Whether `channel` may carry device state.
    pub(crate) fn carries_device_state(&self, channel: u8) -> bool {
        !self.has_dedicated() || channel >= self.first_device_channel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_dedicated_channels_every_channel_carries_both() {
        let roles = ChannelRoles::new(4, 0);
        assert!(!roles.has_dedicated());
        assert!((0..4).all(|channel| roles.carries_ram(channel)));
        assert!((0..4).all(|channel| roles.carries_device_state(channel)));
    }

    #[test]
    fn dedicated_channels_are_the_last_ones() {
        let roles = ChannelRoles::new(4, 1);
        assert!(roles.has_dedicated());
        assert_eq!(
            (0..4).map(|c| roles.carries_ram(c)).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(
            (0..4)
                .map(|c| roles.carries_device_state(c))
                .collect::<Vec<_>>(),
            [false, false, false, true]
        );
    }
}
