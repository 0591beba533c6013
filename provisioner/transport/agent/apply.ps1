# apply: write each file, independently and in order, so that it always holds either its old
# or its new content, with three backups and the merge base kept beside it. The backups rotate
# only once the new content is in place and verified, so a failed write loses no generation.
$Request = $args[0]

function Write-NewFile([string]$Path, [byte[]]$Bytes, $Acl) {
    # Created with its final ACL, so the content is never readable under the folder's defaults.
    $stream = [IO.File]::Create($Path, 4096, [IO.FileOptions]::None, $Acl)
    try {
        $stream.Write($Bytes, 0, $Bytes.Length)
        $stream.Flush($true)
    } finally {
        $stream.Dispose()
    }
}

function New-TempPath([string]$Folder, [string]$Name) {
    # Same folder as the target: File.Replace and File.Move stay atomic only within a volume.
    $random = [Guid]::NewGuid().ToString('N').Substring(0, 12)
    return [IO.Path]::Combine($Folder, ('.{0}.{1}.tmp' -f $Name, $random))
}

function Write-StateFile([string]$StateFolder, [string]$Name, [byte[]]$Bytes, $Acl) {
    $target = [IO.Path]::Combine($StateFolder, $Name)
    $temp = New-TempPath $StateFolder $Name
    try {
        Write-NewFile $temp $Bytes $Acl
        Move-FileOver $temp $target
    } finally {
        Remove-FileQuietly $temp
    }
}

function Invoke-ApplyFile($File, [string]$IfRunning) {
    $item = [ordered]@{
        path = (Get-Field $File 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    $temp = $null
    try {
        $checked = Test-FileRequest $File
        $kind = $checked.kind; $path = $checked.path; $sid = $checked.sid
        $folder = [IO.Path]::GetDirectoryName($path)
        $name = [IO.Path]::GetFileName($path)
        $stateFolder = Get-StateFolder $path
        Remove-StaleTempFiles $folder $name
        Remove-StaleTempFiles $stateFolder 'applied'
        $encoded = Get-Field $File 'content_b64'
        $intended = Get-Field $File 'sha256'
        # Refused rather than guessed: a missing content would truncate the user's file.
        if ($null -eq $encoded -or [string]::IsNullOrEmpty($intended)) {
            throw (New-AgentException 'internal' 'the request gives no content_b64 or no sha256 for this file.')
        }
        $content = [Convert]::FromBase64String([string]$encoded)
        if (-not (Invoke-RunningPolicy $checked $IfRunning $item)) { return $item }

        # Compare-and-swap: anything else than what inspect saw may be the user's own edit.
        $current = $null
        if ([IO.File]::Exists($path)) { $current = Get-Sha256 ([IO.File]::ReadAllBytes($path)) }
        $item['old_sha256'] = $current
        $expected = Get-Field $File 'expect_sha256'
        if ($current -ne $expected) {
            $item['status'] = 'conflict'
            $item['error'] = New-AgentError 'conflict' 'the file changed since inspect.'
            return $item
        }

        if (-not [IO.Directory]::Exists($folder)) {
            # override.ini lives in the install folder: creating that would fake an installation.
            if ($kind -ne 'microsip') {
                throw (New-AgentException 'not-installed' ("the MicroSIP folder {0} does not exist." -f $folder))
            }
            $null = [IO.Directory]::CreateDirectory($folder, (New-Acl $kind $sid $true))
        }

        $temp = New-TempPath $folder $name
        Write-NewFile $temp $content (New-Acl $kind $sid $false)

        $null = [IO.Directory]::CreateDirectory($stateFolder, (New-Acl $kind $sid $true))
        # A backup.new left by an apply that died after its replace is the newest generation.
        Move-BackupsDown $stateFolder
        $pending = [IO.Path]::Combine($stateFolder, 'backup.new')
        $hadFile = [IO.File]::Exists($path)
        if ($hadFile) {
            # The old content waits as backup.new: until the new file is verified, no backup moves.
            Move-ReplacementOver $temp $path $pending
        } else {
            [IO.File]::Move($temp, $path)
        }
        $temp = $null
        # File.Replace keeps the DACL of the file it replaces: set ours again.
        [IO.File]::SetAccessControl($path, (New-Acl $kind $sid $false))

        $written = Get-Sha256 ([IO.File]::ReadAllBytes($path))
        $item['new_sha256'] = $written
        if ($written -ne $intended) {
            if ($hadFile) {
                Move-FileOver $pending $path
                $undone = 'the previous file was put back'
            } else {
                [IO.File]::Delete($path)
                $undone = 'the new file was removed'
            }
            throw (New-AgentException 'verify-failed' ('the file read back differs from the intended content; {0}.' -f $undone))
        }
        if ($hadFile) {
            # Written and verified: only now do the backups move. If that fails, backup.new
            # keeps the old content and the next apply or rollback rotates it in.
            try {
                Move-BackupsDown $stateFolder
                $item['backup'] = [IO.Path]::Combine($stateFolder, 'backup.1')
            } catch {
                $item['backup'] = $pending
            }
        }
        Set-StateAcl $stateFolder $kind $sid

        # The merge base of the next push, with passwords already replaced by the controller.
        $applied = Get-Field $File 'applied_b64'
        if ($null -ne $applied) {
            try {
                Write-StateFile $stateFolder 'applied' ([Convert]::FromBase64String([string]$applied)) (New-Acl $kind $sid $false)
                Set-StateAcl $stateFolder $kind $sid
            } catch {
                # The file itself is written: say so, or the controller would think nothing changed.
                $cause = ConvertTo-AgentError $_
                throw (New-AgentException $cause.code ('the file was written, but not its applied copy: ' + $cause.message))
            }
        }
        $item['status'] = 'written'
    } catch {
        $item['status'] = 'error'
        $item['error'] = ConvertTo-AgentError $_
    } finally {
        if ($null -ne $temp) { Remove-FileQuietly $temp }
    }
    return $item
}

$refusal = Test-Request $Request 'apply'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'apply' ("if_running '{0}' not supported" -f $ifRunning)
}

$files = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -ne $file) { $files.Add((Invoke-ApplyFile $file $ifRunning)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'apply'; ok = $true; files = $files.ToArray() }
