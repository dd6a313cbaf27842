//! QR codes as images: SVG (scalable, small) and PNG (8-bit grayscale), each with the four-module
//! quiet zone scanners need.

use qrcode::{Color, QrCode};

/// Pixels per module in PNGs: a 2.x pairing code (about 60 modules with its quiet zone) comes
/// out near 500 pixels square, easy to scan from a screen.
const PNG_SCALE: usize = 8;
/// Modules of white around the code.
const QUIET: usize = 4;

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit a QR code.
    #[error("cannot encode the code: {0}")]
    Encode(#[from] qrcode::types::QrError),
    /// The PNG encoder failed.
    #[error("cannot write the PNG: {0}")]
    Png(#[from] png::EncodingError),
}

/// `text` as an SVG document.
pub fn svg(text: &str) -> Result<String, QrError> {
    let code = QrCode::new(text.as_bytes())?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(256, 256)
        .build())
}

/// `text` as a PNG image.
pub fn png(text: &str) -> Result<Vec<u8>, QrError> {
    let code = QrCode::new(text.as_bytes())?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != Color::Dark {
            continue;
        }
        let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
        for y in my * PNG_SCALE..(my + 1) * PNG_SCALE {
            let row = y * side;
            pixels[row + mx * PNG_SCALE..row + (mx + 1) * PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    let side = u32::try_from(side).unwrap_or(u32::MAX);
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pairing_code_renders_as_a_png_and_an_svg_with_its_quiet_zone() {
        let text = "2@cfc5d07f6f03c29b,15550001,1";
        let image = png(text).expect("renders");
        assert_eq!(&image[1..4], b"PNG");
        let decoder = png::Decoder::new(image.as_slice());
        let mut reader = decoder.read_info().expect("a PNG");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("a frame");
        let modules = QrCode::new(text.as_bytes()).expect("encodes").width();
        assert_eq!(info.width as usize, (modules + 2 * QUIET) * PNG_SCALE);
        assert!(
            buf[..info.width as usize * QUIET * PNG_SCALE]
                .iter()
                .all(|p| *p == 255)
        );
        assert!(buf.contains(&0), "dark modules drawn");
        let svg = svg(text).expect("renders");
        assert!(svg.contains("<svg") && svg.contains("</svg>"));
    }
}
