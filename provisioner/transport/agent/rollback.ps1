# rollback: put backup.1 back in place of each file, independently and in order.
$Request = $args[0]

function Invoke-RollbackFile($File, [string]$IfRunning) {
    $item = [ordered]@{
        path = (Get-Field $File 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    try {
        $checked = Test-FileRequest $File
        $kind = $checked.kind; $path = $checked.path; $sid = $checked.sid
        $stateFolder = Get-StateFolder $path
        Remove-StaleTempFiles ([IO.Path]::GetDirectoryName($path)) ([IO.Path]::GetFileName($path))
        Remove-StaleTempFiles $stateFolder 'applied'
        # A backup.new left by an apply that died after its replace is the newest generation.
        Move-BackupsDown $stateFolder
        $backup1 = [IO.Path]::Combine($stateFolder, 'backup.1')
        if (-not [IO.File]::Exists($backup1)) {
            throw (New-AgentException 'no-backup' ("there is no backup of {0} to restore." -f $path))
        }
        if (-not (Invoke-RunningPolicy $checked $IfRunning $item)) { return $item }

        $rolledBack = [IO.Path]::Combine($stateFolder, 'rolled-back')
        # The previous rolled-back copy is superseded either way, and File.Replace is only
        # documented for a backup name that is free.
        if ([IO.File]::Exists($rolledBack)) { [IO.File]::Delete($rolledBack) }
        if ([IO.File]::Exists($path)) {
            $item['old_sha256'] = Get-Sha256 ([IO.File]::ReadAllBytes($path))
            # One atomic step: backup.1 becomes the file, the current content becomes rolled-back.
            Move-ReplacementOver $backup1 $path $rolledBack
            $item['backup'] = $rolledBack
        } else {
            [IO.File]::Move($backup1, $path)
        }
        # File.Replace keeps the DACL of the file it replaces, Move that of the backup: set ours.
        [IO.File]::SetAccessControl($path, (New-Acl $kind $sid $false))
        Move-BackupsUp $stateFolder
        # Without a merge base the next push treats the restored file as new.
        $applied = [IO.Path]::Combine($stateFolder, 'applied')
        if ([IO.File]::Exists($applied)) { [IO.File]::Delete($applied) }
        Set-StateAcl $stateFolder $kind $sid
        $item['new_sha256'] = Get-Sha256 ([IO.File]::ReadAllBytes($path))
        $item['status'] = 'restored'
    } catch {
        $item['status'] = 'error'
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'rollback'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'rollback' ("if_running '{0}' not supported" -f $ifRunning)
}

$files = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -ne $file) { $files.Add((Invoke-RollbackFile $file $ifRunning)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'rollback'; ok = $true; files = $files.ToArray() }
