//! ALSA capture and playback (16 kHz mono S16, 20 ms periods). Both are blocking and run on
//! the audio threads of [`crate::audio`].

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};

use crate::hw::{AudioIn, AudioOut, HwError, PcmSink, PcmSource, FRAME_SAMPLES};

/// Periods in the device buffer (4 x 20 ms).
pub const PERIODS: usize = 4;

fn open(device: &str, dir: Direction) -> Result<PCM, HwError> {
    let err = |source| HwError::Alsa {
        device: device.to_owned(),
        source,
    };
    let pcm = PCM::new(device, dir, false).map_err(err)?;
    {
        let hwp = HwParams::any(&pcm).map_err(err)?;
        hwp.set_access(Access::RWInterleaved).map_err(err)?;
        hwp.set_format(Format::s16()).map_err(err)?;
        hwp.set_channels(1).map_err(err)?;
        hwp.set_rate(16_000, ValueOr::Nearest).map_err(err)?;
        hwp.set_period_size_near(FRAME_SAMPLES as _, ValueOr::Nearest)
            .map_err(err)?;
        hwp.set_buffer_size_near((FRAME_SAMPLES * PERIODS) as _)
            .map_err(err)?;
        pcm.hw_params(&hwp).map_err(err)?;
        let rate = hwp.get_rate().map_err(err)?;
        if rate != 16_000 {
            return Err(HwError::AlsaFormat {
                device: device.to_owned(),
                rate,
            });
        }
    }
    pcm.prepare().map_err(err)?;
    Ok(pcm)
}

/// An ALSA capture device by name (`default`, `plughw:1,0`, ...).
#[derive(Debug, Clone)]
pub struct AlsaIn {
    pub device: String,
}

impl AudioIn for AlsaIn {
    fn open(&self) -> Result<Box<dyn PcmSource>, HwError> {
        let pcm = open(&self.device, Direction::Capture)?;
        pcm.start().map_err(|source| HwError::Alsa {
            device: self.device.clone(),
            source,
        })?;
        Ok(Box::new(AlsaSource {
            pcm,
            device: self.device.clone(),
        }))
    }
}

struct AlsaSource {
    pcm: PCM,
    device: String,
}

impl PcmSource for AlsaSource {
    fn read_frame(&mut self, out: &mut [i16; FRAME_SAMPLES]) -> Result<bool, HwError> {
        let err = |source| HwError::Alsa {
            device: self.device.clone(),
            source,
        };
        let io = self.pcm.io_i16().map_err(err)?;
        let mut filled = 0;
        while filled < FRAME_SAMPLES {
            match io.readi(&mut out[filled..]) {
                Ok(0) => return Ok(false),
                Ok(n) => filled += n,
                // Overrun (we were late): recover and go on.
                Err(e) => self.pcm.try_recover(e, true).map_err(err)?,
            }
        }
        Ok(true)
    }
}

/// An ALSA playback device by name.
#[derive(Debug, Clone)]
pub struct AlsaOut {
    pub device: String,
}

impl AudioOut for AlsaOut {
    fn open(&self) -> Result<Box<dyn PcmSink>, HwError> {
        let pcm = open(&self.device, Direction::Playback)?;
        Ok(Box::new(AlsaSink {
            pcm,
            device: self.device.clone(),
        }))
    }
}

struct AlsaSink {
    pcm: PCM,
    device: String,
}

impl PcmSink for AlsaSink {
    fn write_frame(&mut self, pcm: &[i16]) -> Result<(), HwError> {
        let err = |source| HwError::Alsa {
            device: self.device.clone(),
            source,
        };
        let io = self.pcm.io_i16().map_err(err)?;
        let mut done = 0;
        while done < pcm.len() {
            match io.writei(&pcm[done..]) {
                Ok(n) => done += n,
                // Underrun (the stream starved): recover and go on.
                Err(e) => self.pcm.try_recover(e, true).map_err(err)?,
            }
        }
        Ok(())
    }

    fn finish(&mut self, abort: bool) -> Result<(), HwError> {
        let err = |source| HwError::Alsa {
            device: self.device.clone(),
            source,
        };
        if abort {
            self.pcm.drop().map_err(err)
        } else {
            self.pcm.drain().map_err(err)
        }
    }
}
